# A recipe with managed and inline components and parameters, as the Terraform
# AWS provider documents aws_imagebuilder_* resources.
resource "aws_imagebuilder_component" "app" {
  name     = "app-config"
  platform = "Linux"
  version  = "1.0.0"
  data = yamlencode({
    schemaVersion = 1.0
    phases = [{
      name = "build"
      steps = [{
        name   = "Write"
        action = "CreateFile"
        inputs = [{ path = "/etc/app.conf", content = "port=8080" }]
      }]
    }]
  })
}

resource "aws_imagebuilder_component" "from_file" {
  name     = "from-file"
  platform = "Linux"
  version  = "1.0.0"
  uri      = "from-file.yaml"
}

resource "aws_imagebuilder_image_recipe" "app" {
  name         = "app"
  parent_image = "arn:aws:imagebuilder:us-east-1:aws:image/debian-12-x86/x.x.x"
  version      = "1.0.0"

  block_device_mapping {
    device_name = "/dev/xvda"
    ebs {
      delete_on_termination = true
      volume_size           = 8
      volume_type           = "gp3"
    }
  }

  component {
    component_arn = "arn:aws:imagebuilder:us-east-1:aws:component/python-3-linux/x.x.x"
  }
  component {
    component_arn = aws_imagebuilder_component.from_file.arn
    parameter {
      name  = "Message"
      value = "from terraform"
    }
  }
}

resource "aws_imagebuilder_infrastructure_configuration" "app" {
  name                          = "app"
  instance_profile_name         = "EC2InstanceProfileForImageBuilder"
  instance_types                = ["t3.medium"]
  terminate_instance_on_failure = true
}

resource "aws_imagebuilder_image_pipeline" "app" {
  name                             = "app"
  image_recipe_arn                 = aws_imagebuilder_image_recipe.app.arn
  infrastructure_configuration_arn = aws_imagebuilder_infrastructure_configuration.app.arn
  schedule {
    schedule_expression = "cron(0 0 * * ? *)"
  }
}
